"""The adversary (auditor side): attacks on keyed latents, membership inference, the audit and its report.

- ``views``: what each attacker holds, one frozen dataclass per holding, and the threat label each grants;
- ``attacks``, ``membership``: the pure maths; ``procedures``: the attacks, each taking only its views;
- ``suite``: every attack registered once with the views it takes (its threat label is derived from them);
- ``run``: loads a run folder and builds the views (the one audit module that reads keys);
- ``referee``, ``verdicts``: scoring, positive controls, prior-only baselines, margins and statuses;
- ``audit``: ``run_audit``, which builds each attack's declared views, runs it and hands its estimates to the
  referee; ``report``: ``report.md`` and plots.

``attacks``, ``membership``, ``views``, ``procedures`` and ``verdicts`` import no hospital code, key handling, run
loading or referee (the import contract in ``pyproject.toml`` checks). The defences that change how the
coordinator trains (DP-SGD) live with the coordinator, in :mod:`ppcmi.server.dp`; nothing of the coordinator
imports this package.
"""
