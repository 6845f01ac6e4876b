"""Code that runs AT THE COORDINATOR: mapping-network training and inference on keyed latents.

Nothing here imports hospital code or key handling (``ppcmi.client``, ``ppcmi.klt``); a test checks.
"""
