"""lowbit.integer"""
