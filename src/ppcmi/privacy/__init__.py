"""The adversary and the defences (auditor side): attacks on keyed latents, membership inference, DP-SGD.

``attacks`` and ``membership`` are pure maths over arrays and import no hospital code or key
handling (a test checks); ``dp`` trains the mapping network with DP-SGD for the server; ``audit``
plays attacker and referee on a finished run folder and may read every site's key to build its
positive controls. Nothing is imported here, so the server can use ``dp`` without pulling in
the audit.
"""
