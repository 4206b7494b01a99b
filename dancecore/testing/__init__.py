"""Conformance kit for plugin authors: call these from your own tests.

Example, in a third-party reward package's ``tests/test_conformance.py``::

    from dancecore.testing import check_reward_plugin

    def test_my_reward_conforms():
        check_reward_plugin("my-reward", {"some_option": 1})

and in a policy or sampler package's::

    from dancecore.testing import check_policy_plugin, check_sampler_plugin

    def test_my_policy_conforms():
        check_policy_plugin("my-policy", {"preset": "tiny"})

    def test_my_sampler_conforms():
        check_sampler_plugin("my-sampler", {"num_steps": 4})  # on the torch-only tiny policy

Each check raises ``AssertionError`` with a message saying what the plugin got wrong.
``TinyFlowPolicy`` (``testing-tiny``) and ``TinyEpsilonPolicy`` (``testing-tiny-eps``) are torch-only
policies for tests (no diffusers, no download). Importing this package imports neither diffusers
nor transformers.

Modules: :mod:`~dancecore.testing.kits` (the conformance checks),
:mod:`~dancecore.testing.tiny_policy` (the tiny policies), :mod:`~dancecore.testing.helpers`,
:mod:`~dancecore.testing.pipelines` (the deterministic rollout, for pipeline-equivalence tests).
:mod:`~dancecore.testing.serving_kit` (``serve_rewards``, ``check_served_reward``: a reward over HTTP).
:mod:`~dancecore.testing.sequence_parallel_kit` (``sequence_parallel_differences``: a split policy
against the whole one, on every rank of a sequence-parallel group).
"""

from __future__ import annotations

from dancecore.config.schema import load_run, validate
from dancecore.functional.grpo import group_advantages, trainable_steps
from dancecore.outputs.video import write_video
from dancecore.registry import contract_problems
from dancecore.registry import load as load_plugin
from dancecore.testing.attention_kit import check_attention_backends
from dancecore.testing.export_kit import check_diffusers_export
from dancecore.testing.helpers import DEFAULT_PROMPTS, build_component, prompt_batch, recipe_overrides, sample_images
from dancecore.testing.kits import check_policy_plugin, check_sampler_plugin
from dancecore.testing.pipelines import DeterministicRollout, deterministic_rollout
from dancecore.testing.plan_kit import check_memory_plan, plan_activations
from dancecore.testing.reward_kit import check_reward_plugin
from dancecore.testing.sequence_parallel_kit import sequence_parallel_differences
from dancecore.testing.serving_kit import check_served_reward, serve_rewards
from dancecore.testing.tiny_policy import TinyConditioning, TinyEpsilonPolicy, TinyFlowPolicy
from dancecore.training.prompts import read_prompt_file

__all__ = [
    "DEFAULT_PROMPTS",
    "DeterministicRollout",
    "TinyConditioning",
    "TinyEpsilonPolicy",
    "TinyFlowPolicy",
    "build_component",
    "check_diffusers_export",
    "check_memory_plan",
    "plan_activations",
    "check_attention_backends",
    "check_policy_plugin",
    "check_reward_plugin",
    "check_sampler_plugin",
    "check_served_reward",
    "contract_problems",
    "deterministic_rollout",
    "group_advantages",
    "load_plugin",
    "load_run",
    "prompt_batch",
    "read_prompt_file",
    "recipe_overrides",
    "sample_images",
    "sequence_parallel_differences",
    "serve_rewards",
    "trainable_steps",
    "validate",
    "write_video",
]
