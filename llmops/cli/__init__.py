"""The command-line interface: parse arguments, call one library function, render, exit.

Only this package imports click and rich, and only this package prints.
"""
