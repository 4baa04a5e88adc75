"""Decision policies for the agents: rules, learned policies and the estimators they use.

* :mod:`autofab.agents.policies.pdm`: predictive maintenance, a remaining-useful-life
  estimator trained on simulated run-to-failure data, and an online tracker that a
  condition-based maintenance policy reads.
* :mod:`autofab.agents.policies.bidding_policy`: a machine agent's learned bidding policy
  (a numpy gate over honest bids), its ``.npz`` file and its training on in-memory
  negotiations; ``load_bidding_policy("default" | "rules" | PATH)`` gives what
  ``MachineAgent(policy=...)`` takes.
* :mod:`autofab.agents.policies.shared_training`: one MaskablePPO policy shared by every
  machine of ``factory_parallel_v0``.

Modules are imported by name (``from autofab.agents.policies.pdm import RulEstimator``), so
importing this package stays cheap and pulls in no optional dependency (SB3, torch).
"""
