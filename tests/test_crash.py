"""The crash test in the suite: mail from 20 senders that resend what was not acknowledged,
while `postroom serve` is killed with SIGKILL eight times, 0.5-1.5 s after each start, then
stopped with SIGTERM four times, then run with `[smtp] workers = 2` and its whole process
group killed four times (tests/crashload.py): about half a minute. `make test` makes half as
many restarts of each kind; `make test-long` all of them. Nothing acknowledged is
lost or stored twice, no message with a Message-ID is stored twice even when its sender
resent it, and `store check` is clean. bench/crash.py runs the same for 40,000 messages."""

from __future__ import annotations

import pytest

import scale
from conftest import free_port
from crashload import Phase, prepare, run


@pytest.mark.long
def test_mail_survives_sigkill_sigterm_and_process_group_kills(write_config, data_dir, tmp_path):
    port = free_port()
    smtp = {"listen": [f"127.0.0.1:{port}"], "max_connections_per_ip": 200}
    configs = {workers: write_config(f"crash-{workers}.toml", smtp={**smtp, "workers": workers},
                                     server={"log_level": "warning"})
               for workers in (1, 2)}
    prepare(data_dir, configs[1])
    # Counted, not timed: a loaded machine makes each restart slower, never the test weaker.
    # The seconds only bound a phase whose restarts take far too long.
    kills, terms, groups = scale.count(4, 8), scale.count(2, 4), scale.count(2, 4)
    phases = [Phase("kill", 60, restarts=kills), Phase("term", 30, restarts=terms),
              Phase("group", 30, workers=2, restarts=groups)]
    outcome = run(configs, phases, tmp_path, host="127.0.0.1", port=port, clients=20, total=10**9,
                  drain_seconds=30, interval=(0.5, 1.5))
    print(outcome.summary())
    assert outcome.restarts == kills + terms + groups, outcome.summary()
    assert outcome.acknowledged >= 31 * outcome.restarts, "the senders barely got through: the test proves little"
    assert outcome.lost == [], outcome.summary()
    assert outcome.duplicated_acknowledged == [], outcome.summary()
    assert outcome.duplicated == [], outcome.summary()
    assert outcome.refused == [], outcome.refused[:10]
    assert outcome.orphans == [], outcome.orphans
    assert outcome.check_problems == [], outcome.check_problems[:10]
    assert outcome.unfinished == 0, outcome.summary()
