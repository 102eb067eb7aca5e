"""What the commands do besides plan and apply, without click: `show`, the graph text,
`rollback`/`down`, `init`'s scaffolding and a plan as a pull-request comment.
"""
