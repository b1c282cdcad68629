"""How runs start: the ``mads`` CLI, ``mads train`` (YAML to Composer Trainer), the demo, llm-foundry.

Nothing is imported here: each entry module pulls in only the layers it needs.
"""
