"""lowbit.mixed"""
