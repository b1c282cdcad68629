"""Run configurations shipped with streaming-mads, installed as ``streaming_mads.yamls``.

``mads train quickstart-cpu.yaml`` finds these by name (see ``streaming_mads.run.config.find_config``).
"""
