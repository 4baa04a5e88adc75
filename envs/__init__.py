"""The plant model and its Gymnasium environments.

Importing this package registers ``autofab/JobShop-v0`` and ``autofab/Factory-v0`` with
Gymnasium::

    import gymnasium as gym
    import autofab.envs

    env = gym.make("autofab/JobShop-v0", instance="ta01")
"""

from gymnasium.envs.registration import register, registry

from autofab.envs import parallel as factory_parallel_v0
from autofab.envs.baselines import FactoryPolicy, policy_from_spec
from autofab.envs.factory import FactoryEnv
from autofab.envs.factory_model import Decision, FactoryModel, run_shift
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
from autofab.envs.plant import PlantConfig, PlantConfigError, load_plant
from autofab.envs.rules import RULES, RulePolicy, run_episode
from autofab.envs.validate import ScheduleError, schedule_violations, validate_schedule

__all__ = [
    "RULES",
    "Decision",
    "FactoryEnv",
    "FactoryModel",
    "FactoryPolicy",
    "Instance",
    "InstanceError",
    "InvalidActionError",
    "JobShopEnv",
    "PlantConfig",
    "PlantConfigError",
    "PlantModel",
    "RulePolicy",
    "ScheduleError",
    "benchmark_names",
    "factory_parallel_v0",
    "instance_from_dict",
    "instance_to_dict",
    "load_instance",
    "load_plant",
    "policy_from_spec",
    "random_instance",
    "run_episode",
    "run_shift",
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
