"""The plant model and its Gymnasium environments.

Importing this package registers ``autofab/JobShop-v0`` and ``autofab/Factory-v0`` with
Gymnasium::

    import gymnasium as gym
    import autofab.envs

    env = gym.make("autofab/JobShop-v0", instance="ta01")
"""

from gymnasium.envs.registration import register, registry

from autofab.envs.instances import (
    Instance,
    InstanceError,
    benchmark_names,
    instance_from_dict,
    instance_to_dict,
    load_instance,
    random_instance,
    save_instance,
)
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.model import InvalidActionError, PlantModel
from autofab.envs.rules import RULES, RulePolicy, run_episode
from autofab.envs.validate import ScheduleError, schedule_violations, validate_schedule

__all__ = [
    "RULES",
    "Instance",
    "InstanceError",
    "InvalidActionError",
    "JobShopEnv",
    "PlantModel",
    "RulePolicy",
    "ScheduleError",
    "benchmark_names",
    "instance_from_dict",
    "instance_to_dict",
    "load_instance",
    "random_instance",
    "run_episode",
    "save_instance",
    "schedule_violations",
    "validate_schedule",
]

# No OrderEnforcing or PassiveEnvChecker wrappers: the env enforces reset-before-step
# itself and is held to both env checkers by the tests, so gym.make returns the env and
# env.action_masks() works without reaching through wrappers (Gymnasium 1.x wrappers do
# not forward attributes).
for _id, _entry in (
    ("autofab/JobShop-v0", "autofab.envs.jobshop:JobShopEnv"),
    ("autofab/Factory-v0", "autofab.envs.factory:FactoryEnv"),
):
    if _id not in registry:
        register(id=_id, entry_point=_entry, order_enforce=False, disable_env_checker=True)
