"""Turns NIXL's progress thread off in every process of a vLLM peer (integration/compare_vllm_pd.sh
puts this directory on the vLLM servers' PYTHONPATH; vLLM is a benchmark peer, never a kvxfer
dependency, and this file is never imported by kvxfer).

vLLM 0.32's NixlConnector builds its agent with NIXL's default config, whose progress thread
spins a whole core per agent; on this 2-core host it takes the core the other instance is pinned
to, so vLLM's best configuration here has it off (as kvxfer's agents do). vLLM has no option for
it, and its workers are spawned processes, so the default is changed here, at interpreter start.
KVX_NIXL_PROGRESS_THREAD=1 leaves NIXL's default (thread on), to measure what it changes.
"""

import os

# vLLM sets this itself only when it imports NIXL first, which it no longer does.
os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")


def _progress_thread_off() -> None:
    try:
        import nixl._api
    except ImportError:  # the script checks that the vLLM environment has NIXL
        return
    _init = nixl._api.nixl_agent_config.__init__

    def _no_progress_thread(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.enable_pthread = False

    nixl._api.nixl_agent_config.__init__ = _no_progress_thread


if os.environ.get("KVX_NIXL_PROGRESS_THREAD") != "1":
    _progress_thread_off()
