"""lowbit.service"""
