"""Shipped configuration files (a data package: installed as ``autofab.configs``).

Plant YAMLs (``demo.yaml``, ``plant100.yaml``) live here so that ``load_plant("demo")``
works from a regular install as well as from a source checkout.
"""
