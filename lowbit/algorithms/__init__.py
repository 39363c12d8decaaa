"""lowbit.algorithms"""
