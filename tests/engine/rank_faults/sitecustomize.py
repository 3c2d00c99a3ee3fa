"""Test-only fault injection for spawned TP ranks (never imported by kvxfer itself).

A test puts this directory first on PYTHONPATH and names a fault in KVXFER_TEST_RANK_FAULT;
the rank processes the engine spawns then start with it (rank 0 lives in the test process,
which started before, so only spawned ranks are affected):

- "register-unreachable": the rank registers with a side channel nobody listens on
  (KVXFER_TEST_DEAD_PORT) and gives up after 1 s, as a rank cut off from its instance's side channel would.
- "model-error-on-release": the first model step that carries a release raises on this rank
  after the model ran (so the other ranks' collectives completed).
"""

import os

_FAULT = os.environ.get("KVXFER_TEST_RANK_FAULT")

if _FAULT == "register-unreachable":
    from kvxfer.connectors import nixl_worker

    _register = nixl_worker.register_rank
    _dead_port = int(os.environ["KVXFER_TEST_DEAD_PORT"])

    def _register_unreachable(host, port, msg, timeout_s, auth):
        return _register(host, _dead_port, msg, 1.0, auth)

    nixl_worker.register_rank = _register_unreachable

elif _FAULT == "model-error-on-release":
    from kvxfer.engine import model_runner

    _run = model_runner.ModelRunner.run
    _failed = []

    def _run_then_fail_once(self, step):
        result = _run(self, step)
        if step.connector_meta is not None and step.connector_meta.release and not _failed:
            _failed.append(True)
            raise RuntimeError("injected model failure")
        return result

    model_runner.ModelRunner.run = _run_then_fail_once
