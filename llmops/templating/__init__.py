"""Prompt templates: a sandboxed Jinja2 environment with budgets, and the one prompt path
(completion and chat) that training, evaluation, serving and monitoring share.
"""
