"""lowbit.analysis"""
