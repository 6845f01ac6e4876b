"""The adversary (auditor side): attacks on keyed latents, membership inference, the audit and its report.

``attacks`` and ``membership`` are pure maths over arrays and import no hospital code or key
handling (the import contract in ``pyproject.toml`` checks); ``audit`` plays attacker and referee on
a finished run folder and may read every site's key to build its positive controls. The defences
that change how the coordinator trains (DP-SGD) live with the coordinator, in :mod:`ppcmi.server.dp`;
nothing of the coordinator imports this package.
"""
