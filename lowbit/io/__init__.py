"""lowbit.io"""
