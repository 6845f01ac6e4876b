"""Multi-site orchestration on Flower (both sides, split by file): real SuperLink, SuperNodes and TLS.

- ``client_app``: AT A HOSPITAL. The Flower ClientApp; thin over :mod:`ppcmi.client.node`, which
  does the work from the SuperNode's ``node_config`` (site folder, data folders, site id).
- ``server_app``: AT THE COORDINATOR. The Flower ServerApp: asks every SuperNode to train its
  autoencoders, pools their keyed latents, trains the mapping network, runs the evaluation round
  and writes the aggregate summary. It imports no hospital code.
- ``wire``: both sides. Protocol bytes in and out of Flower records, message types, the shared
  run configuration (no paths, no keys) and metric summaries as flat records.
- ``auth``: SuperNode authentication key pairs (ECDSA, OpenSSH format, as Flower reads them).
- ``deploy``: plays every role on one machine with real processes (``ppcmi deploy``); its ``federation``
  (certificates, keys, SuperLink, SuperNodes) serves every app.
- ``unet_client_app`` (AT A HOSPITAL), ``unet_server_app`` (AT THE COORDINATOR), ``unet_wire`` (both sides):
  the federated U-Net baselines of ``ppcmi bench`` (``unet_fedavg``, ``unet_fedprox``): Flower's own FedAvg
  and FedProx over the hospitals' model updates; ``fedunet`` runs them on a federation of the bench's hospitals.
- ``core_client_app`` (AT A HOSPITAL), ``core_server_app`` (AT THE COORDINATOR), ``core_wire`` (both sides): the
  federated mapping core (``mapping.scope = "federated"``, ``ppcmi bench`` method ``ppcmi_federated``): each hospital
  trains on its own keyed latents and only the shared core crosses, summed under SecAgg+; ``fedcore`` runs it.

Nothing here is imported by the rest of the package: Flower stays an optional extra.
"""
