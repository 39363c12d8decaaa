"""lowbit.distributed"""
