"""Decision policies for the agents: rules, learned policies and the estimators they use.

* :mod:`autofab.agents.policies.pdm`: predictive maintenance, a remaining-useful-life
  estimator trained on simulated run-to-failure data, and an online tracker that a
  condition-based maintenance policy reads.

Modules are imported by name (``from autofab.agents.policies.pdm import RulEstimator``), so
importing this package stays cheap and pulls in no optional dependency.
"""
