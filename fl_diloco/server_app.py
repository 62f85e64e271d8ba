"""The ServerApp: runs the outer loop of every DiLoCo variant over the connected SuperNodes.

Before round 1 every worker gets θ(0) and starts training. Each Flower round then syncs one
fragment (the whole model unless streaming): the server sends the average the workers need
next, collects their outer gradients, and the strategy updates θ (strategies/diloco.py).
`delayed` and `eager` keep several rounds open at once (RoundPipeline), so a slow link is
hidden behind the workers' computing. θ is evaluated on the held-out split every `eval_every`
outer steps; one line is logged per round. At the end: shut the workers down, save the final
checkpoint, summary.json and the loss plot under the run's output directory.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import time
from itertools import chain
from collections.abc import Collection, Iterator, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid, http_grid
from flwr.supercore import log

from clients.channel import LOG_NAME, worker_dir_name, worker_log_tail
from clients.progress import slowest_step
from clients.worker import optimizer_state_dir, worker_threads
from fl_diloco import round_events
from fl_diloco.checkpoint import TrainingState, save_checkpoint, save_training_checkpoint
from fl_diloco.client_app import PREPARE_ACTION, RUN_CONFIG_KEY, SHUTDOWN_ACTION
from fl_diloco.config import ConfigError, RunConfig, resolve_device
from fl_diloco.data import Corpus, load_corpus
from fl_diloco.evaluation import evaluate
from fl_diloco.flops import model_flops_per_token
from fl_diloco.model import Transformer, load_parameters, model_config, num_parameters
from fl_diloco.object_pull import pull_objects_sooner
from fl_diloco.preflight import check_before_start
from fl_diloco.reporting import SUMMARY_NAME, RunLog, compute_utilization, failure_recorded, finish_run, throughput
from fl_diloco.resume import complete_message, finished_summary, load_resume
from fl_diloco.run_dir import prepare_out_dir, read_run_id
from strategies.diloco import DiLoCo, RoundStats
from strategies.wire import serialized_bytes


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The first `count` connected node ids (sorted, so runs are reproducible)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num_clients={count} but only {len(nodes)} SuperNode(s) connected after "
                f"{timeout:.0f}s. Start more SuperNodes, or for `flwr run` simulation pass "
                f"--federation-config \"num_supernodes={count}\", or lower num_clients."
            )
        log(INFO, "waiting for SuperNodes: %d of %d connected", len(nodes), count)
        time.sleep(1.0)


# Seconds between the ServerApp's pulls for replies that have not come: a reply is noticed
# within this of reaching the SuperLink, at one small request per open message per interval.
# (Flower's own Grid.send_and_receive sleeps 3 s between pulls.)
POLL_INTERVAL = 0.05


def pull_arrived(grid: Grid, waiting: dict[str, Any]) -> Iterator[tuple[Any, Message, float]]:
    """One pull for each message id in `waiting` (id → what the caller knows of it); yields
    (that value, the reply, when its pull began) for each answered message, which leaves `waiting`."""
    for message_id in list(waiting):
        pull_began = time.time()
        for reply in grid.pull_messages([message_id]):
            yield waiting.pop(message_id), reply, pull_began


def query_workers(grid: Grid, node_ids: list[int], action: str, timeout: float,
                  content: RecordDict | None = None) -> list[int]:
    """Send a `query.<action>` to every node; returns the nodes that did not confirm."""
    messages = [Message(content=content or RecordDict({"config": ConfigRecord({})}),
                        message_type=f"{MessageType.QUERY}.{action}", dst_node_id=node)
                for node in node_ids]
    # Pulled by the id of the message asked: an error the SuperLink writes for a node it lost
    # carries the SuperLink's own id as sender.
    waiting = dict(zip(grid.push_messages(messages), node_ids, strict=True))
    confirmed = set()
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for node, reply, _ in pull_arrived(grid, waiting):
            if reply.has_error():
                log(WARNING, "node %d could not %s its worker: %s", node, action, reply.error.reason)
            else:
                confirmed.add(node)
        if waiting:
            time.sleep(POLL_INTERVAL)
    return [node for node in node_ids if node not in confirmed]


def startup_failure(run_id: int, nodes: list[int], startup_timeout: float) -> str:
    """Why the run stops before round 1: which nodes' workers did not confirm start-up, and the
    end of each one's worker log where this machine has it (else where it is on the node)."""
    lines = [f"the workers of nodes {nodes} did not confirm start-up within startup_timeout="
             f"{startup_timeout:.0f}s (an error a node sent back is logged above); raise "
             f"startup_timeout if they are only slow"]
    for node in nodes:
        tail = worker_log_tail(run_id, node)
        if tail is None:
            lines.append(f"node {node}: its worker log is on that node, at "
                         f"$FL_DILOCO_RUNTIME_DIR/{worker_dir_name(run_id, node)}/{LOG_NAME} "
                         f"(default runtime folder: fl-diloco-<uid> in its temp folder)")
        else:
            lines.append(f"node {node}: the end of its worker log:\n"
                         + textwrap.indent(tail or "(empty)", "    "))
    return "\n".join(lines)


class RoundPipeline:
    """Keeps up to D rounds open at once (D = strategy.in_flight) and closes them in order.

    Round r's messages go out as soon as round r − D is aggregated, so for `delayed` and
    `eager` the server never makes a worker wait on a round it could already have opened.
    Replies are pulled one message at a time and handed on as they come, so the server never
    holds more than one reply it has not yet folded into the average. Replies that come after
    their round closed are handed on too: the strategy rejects and logs them.

    A failure is reported as the node that was asked (strategy.node_failed): an error reply
    the SuperLink writes for a node it lost carries the SuperLink's own id as its sender, so
    the node is looked up by the id of the message the reply answers.
    """

    def __init__(self, grid: Grid, strategy: DiLoCo, cfg: RunConfig, first_round: int = 1,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.grid, self.strategy, self.cfg = grid, strategy, cfg
        self.last_round, self.timeout, self.poll_interval = cfg.flower_rounds, cfg.round_timeout, poll_interval
        self.next_to_send = first_round
        self.open: dict[int, dict[str, int]] = {}  # round → {id of an unanswered message: its node}
        # Messages whose round closed without their reply → (that round, their node); kept
        # for a few rounds.
        self.late: dict[str, tuple[int, int]] = {}
        self.resyncs: dict[str, int] = {}  # id of a prepare message → its node
        self.resynced_after: dict[int, int] = {}  # node → the round after which it got the state

    def send_ready_rounds(self, aggregated_up_to: int) -> None:
        while (self.next_to_send <= self.last_round
               and self.next_to_send - self.strategy.in_flight <= aggregated_up_to):
            round_events.record("round_opening", self.next_to_send)
            messages = list(self.strategy.configure_train(self.next_to_send))
            round_events.record("round_configured", self.next_to_send)
            nodes = [m.metadata.dst_node_id for m in messages]
            self.open[self.next_to_send] = dict(zip(self.grid.push_messages(messages), nodes, strict=True))
            round_events.record("round_pushed", self.next_to_send, messages=self.open[self.next_to_send])
            self.next_to_send += 1

    def resync_workers(self, aggregated_up_to: int) -> None:
        """Send the server's state to nodes whose worker restarted (strategy.needs_state).

        Messages opened before the state went out will still find the fresh worker without
        it; only a request opened after that (≥ D rounds later) asking again means the state
        did not arrive, and is answered with the state as it is then.
        """
        for node, asked_in in sorted(self.strategy.needs_state.items()):
            sent_after = self.resynced_after.get(node)
            if sent_after is None or asked_in >= sent_after + self.strategy.in_flight:
                content = prepare_content(self.strategy, self.cfg, aggregated_up_to)
                message = Message(content=content, message_type=f"{MessageType.QUERY}.{PREPARE_ACTION}",
                                  dst_node_id=node)
                (message_id,) = self.grid.push_messages([message])
                self.resyncs[message_id] = node
                self.resynced_after[node] = aggregated_up_to
                log(INFO, "node %d: sent it the state after round %d; it contributes again from "
                    "its next request", node, aggregated_up_to)
        self.strategy.needs_state.clear()

    def collect(self, server_round: int) -> Iterator[Message]:
        """Round r's replies as they arrive: all of them, or those in within `timeout` seconds
        of round r − 1 closing (a round opened early may wait for phases still to run before
        it). Late replies to closed rounds come along, for the strategy to reject."""
        waiting = self.open.pop(server_round)
        deadline = time.monotonic() + self.timeout
        while waiting and time.monotonic() < deadline:
            this_round = (((server_round, node), reply, began)
                          for node, reply, began in pull_arrived(self.grid, waiting))
            for (asked_in, node), reply, pull_began in chain(this_round, pull_arrived(self.grid, self.late)):
                if not reply.has_error():
                    round_events.record("reply_pulled", asked_in, node, message_id=reply.metadata.message_id,
                                        pull_began=pull_began)
                    yield reply
                elif asked_in == server_round:
                    self.strategy.node_failed(server_round, node, reply.error.reason)
                else:  # counted when its round closed without it
                    log(WARNING, "round %d: node %d answered round %d, which closed without it, "
                        "with an error: %s", server_round, node, asked_in, reply.error.reason)
            self._check_resyncs()
            if waiting:
                time.sleep(self.poll_interval)
        for node in sorted(waiting.values()):
            self.strategy.node_failed(server_round, node, f"no reply within round_timeout={self.timeout:g}s")
        self.late = {m: (r, node) for m, (r, node) in self.late.items()
                     if r > server_round - 3 * self.strategy.in_flight}
        self.late.update({m: (server_round, node) for m, node in waiting.items()})

    def _check_resyncs(self) -> None:
        for node, reply, _ in pull_arrived(self.grid, self.resyncs):
            if reply.has_error():
                log(WARNING, "node %d could not take the server's state: %s", node, reply.error.reason)


def check_partitions(corpus: Corpus, cfg: RunConfig) -> None:
    """Fail before training if some worker's shard cannot fill one batch."""
    for partition in range(cfg.num_clients):
        available = len(corpus.train_sequences(partition, cfg.num_clients))
        if available < cfg.batch_size:
            raise ConfigError(
                f"num_clients={cfg.num_clients}: shard {partition} holds {available} sequences of "
                f"seq_len={cfg.seq_len}, fewer than batch_size={cfg.batch_size}; lower num_clients, "
                f"batch_size or seq_len, or use more documents"
            )


def prepare_content(strategy: DiLoCo, cfg: RunConfig, after_round: int) -> RecordDict:
    """A prepare message: the worker's state after `after_round`, and the run config the server
    resolved (a resumed run's config comes from its checkpoint, not from the node)."""
    content = strategy.worker_state(after_round)
    content[RUN_CONFIG_KEY] = ConfigRecord(cfg.to_dict())
    return content


def server_threads(cfg: RunConfig) -> int:
    """Torch threads for the server's evaluation and aggregation: `server_threads`, or (0) the
    cores that num_clients workers of `worker_threads` threads each leave free on this
    machine, at least 1. That assumes the workers share the machine, as they do in simulation;
    a coordinating site with cores of its own sets server_threads."""
    if cfg.server_threads:
        return cfg.server_threads
    return max(1, (os.cpu_count() or 1) - cfg.num_clients * worker_threads(cfg))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads (in this thread), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_server(grid: Grid, cfg: RunConfig, explicit_keys: Collection[str] = ()) -> dict[str, Any]:
    """DiLoCo's outer loop; returns the run's summary (also written to summary.json).

    With `cfg.resume` it continues or extends that run (fl_diloco/resume.py; `explicit_keys`
    are the keys the launch set itself); a run that is already complete is left as it is and
    its summary returned, without a word to the workers.
    """
    if cfg.algorithm == "dp":
        raise ConfigError("algorithm=dp is the single-process data-parallel baseline, not a Flower "
                          "run; start it with `fl-diloco train algorithm=dp`")
    # A resume reads (and verifies) its checkpoint before writing anything, so a corrupt one
    # leaves the run directory exactly as it was.
    resumed = None
    if cfg.resume:
        cfg, resumed = load_resume(cfg, explicit_keys)
        if (summary := finished_summary(cfg)) is not None:
            log(INFO, "%s", complete_message(cfg))
            return summary
    # `flwr run` reaches here without the CLI's checks; in a simulation the workers share this machine.
    check_before_start(cfg, workers_here=cfg.num_clients if isinstance(grid, InMemoryGrid) else 0)
    out_dir = prepare_out_dir(cfg)
    if resumed:  # the run is unfinished again until it writes a new summary
        (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    with failure_recorded(out_dir), torch_threads(server_threads(cfg)):
        # The workers key their node-local state by the run's directory: give them the real one.
        return train_rounds(grid, cfg.replace(out_dir=str(out_dir)), resumed)


def train_rounds(grid: Grid, cfg: RunConfig, resumed: TrainingState | None) -> dict[str, Any]:
    """The run once its out_dir exists: start the workers, run every round, write the results."""
    out_dir = Path(cfg.out_dir)
    log(INFO, "fl-diloco %s: writing to %s; the server uses %d torch thread(s) (server_threads)",
        cfg.algorithm, out_dir, torch.get_num_threads())
    # Building the corpus here first also fills the tokenizer/token cache the workers read.
    log(INFO, "loading the corpus (data_source=%s; a source's first run also trains its tokenizer)",
        cfg.data_source)
    corpus = load_corpus(cfg.data_config())
    check_partitions(corpus, cfg)
    validation = corpus.validation_sequences()[: cfg.eval_sequences]
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg.model_preset, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len)
    model = Transformer(model_cfg).to(device)

    def eval_params(params: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """The held-out loss of `params`, and the seconds the server took to evaluate it."""
        began = time.perf_counter()
        load_parameters(model, params)
        loss = evaluate(model, validation, cfg.batch_size, device)["eval_loss"]
        return loss, time.perf_counter() - began

    node_ids = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout)
    strategy = DiLoCo.from_config(cfg, {n: p.detach().cpu() for n, p in model.named_parameters()},
                                  node_ids)
    start_round, tokens_total = 0, 0
    if resumed:
        strategy.load_state_dict(resumed.outer_tensors, resumed.meta["strategy"])
        start_round, tokens_total = resumed.round, int(resumed.meta["tokens_total"])
        torch.set_rng_state(torch.tensor(resumed.meta["torch_rng_state"], dtype=torch.uint8))
        log(INFO, "resuming from %s: round %d of %d", resumed.path, start_round, cfg.flower_rounds)
    strategy.summary()
    setup_began = time.perf_counter()
    worker_state = prepare_content(strategy, cfg, start_round)
    log(INFO, "starting %d workers: each loads the corpus and builds its model", len(node_ids))
    not_ready = query_workers(grid, node_ids, PREPARE_ACTION, cfg.startup_timeout, worker_state)
    round_began = time.perf_counter()  # the workers train from here on (see the tokens/s below)
    if not_ready:
        # The others are training already: stop them rather than leave them waiting for rounds.
        query_workers(grid, node_ids, SHUTDOWN_ACTION, timeout=30)
        raise RuntimeError(startup_failure(grid.run.run_id, not_ready, cfg.startup_timeout))
    # This launch, after those whose rounds the checkpoint holds: a resumed run's summary
    # adds up their start-ups (each launch starts its workers anew).
    launch = {"from_round": start_round, "worker_setup_seconds": round_began - setup_began,
              "setup_bytes_down": serialized_bytes(worker_state) * len(node_ids)}
    launches = [*(resumed.meta.get("launches", []) if resumed else []), launch]
    run_id = read_run_id(out_dir)  # in every checkpoint: a resume checks it is this directory's
    log(INFO, "%d workers ready in %.1fs; they are training", len(node_ids), launch["worker_setup_seconds"])
    if not resumed:  # said before the progress bar appears, which a log line would break
        log(INFO, "evaluating the initial model on %d held-out sequences", len(validation))
    worker_folders = [optimizer_state_dir(cfg, p) for p in range(cfg.num_clients)]
    run_log = RunLog(out_dir, cfg.flower_rounds, continue_after=start_round if resumed else None,
                     tensorboard=cfg.tensorboard, steps_per_round=cfg.sync_interval,
                     step_source=lambda: slowest_step(worker_folders))
    if not resumed:
        eval_loss, eval_seconds = eval_params(strategy.params)
        run_log.log({"round": 0, "outer_step": 0, "tokens_total": 0, "eval_loss": eval_loss,
                     "eval_seconds": eval_seconds})

    pipeline = RoundPipeline(grid, strategy, cfg, first_round=start_round + 1)
    pipeline.send_ready_rounds(aggregated_up_to=start_round)
    for server_round in range(start_round + 1, cfg.flower_rounds + 1):
        strategy.aggregate_train(server_round, pipeline.collect(server_round))
        round_events.record("round_closed", server_round)
        # tokens/s is the tokens the workers trained for this round over the wall seconds from
        # the previous round's close (or the workers' start) to this one's: the span of the
        # round's compute, as the workers train on while the server evaluates. The spans add
        # up to the run's training time, so the rates average to its throughput.
        round_closed = time.perf_counter()
        round_seconds, round_began = round_closed - round_began, round_closed
        pipeline.resync_workers(aggregated_up_to=server_round)
        # Open the next round(s) before evaluating, so evaluation never delays a worker.
        pipeline.send_ready_rounds(aggregated_up_to=server_round)
        stats = strategy.history[-1]
        tokens_total += stats.tokens
        tokens_per_second_per_worker, round_mfu = throughput(stats.per_client)
        due = server_round % (cfg.eval_every * cfg.num_fragments) == 0 or server_round == cfg.flower_rounds
        eval_loss, eval_seconds = eval_params(strategy.params) if due else (None, None)
        if due:
            round_events.record("evaluated", server_round, seconds=eval_seconds)
        run_log.log({
            "round": server_round,
            "outer_step": server_round / cfg.num_fragments,
            "fragment": stats.fragment,
            "train_loss": stats.train_loss,
            "eval_loss": eval_loss,
            "eval_seconds": eval_seconds,
            "tokens": stats.tokens,
            "tokens_total": tokens_total,
            "tokens_per_second": stats.tokens / round_seconds,
            "tokens_per_second_per_worker": tokens_per_second_per_worker,
            "mfu": round_mfu,
            "participants": stats.participants,
            "rejected": stats.rejected,
            "unavailable": len(stats.unavailable_nodes),
            "unavailable_nodes": sorted(stats.unavailable_nodes),
            "compute_seconds": stats.compute_seconds,
            "idle_seconds": stats.idle_seconds,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "clients": stats.per_client,
        })
        # The final round always: so that every finished run can be extended.
        if cfg.checkpoint_due(server_round) or server_round == cfg.flower_rounds:
            outer_tensors, strategy_meta = strategy.state_dict()
            save_training_checkpoint(
                out_dir, server_round, strategy.params, outer_tensors,
                {"run_id": run_id, "launches": launches,
                 "tokens_total": tokens_total, "strategy": strategy_meta,
                 "torch_rng_state": torch.get_rng_state().tolist(),
                 # Every worker is at inner step round·H/P; its data stream position follows
                 # from that step and the seed (clients.inner_loop.InnerTrainer.start_at).
                 "data_positions": {str(p): server_round * cfg.sync_interval
                                    for p in range(cfg.num_clients)}},
                cfg, model_cfg, keep=cfg.keep_checkpoints)

    if query_workers(grid, node_ids, SHUTDOWN_ACTION, timeout=60):
        log(INFO, "some workers did not confirm shutdown; they exit at their idle timeout")
    save_checkpoint(out_dir / "checkpoint", strategy.params, cfg, model_cfg,
                    extra={"round": cfg.flower_rounds, "tokens": tokens_total})
    history = strategy.history
    setup_bytes = sum(launch["setup_bytes_down"] for launch in launches)
    return finish_run(
        out_dir, cfg.algorithm, cfg, run_log,
        compute_seconds=sum(s.compute_seconds for s in history),
        idle_seconds=sum(s.idle_seconds for s in history),
        bytes_up=sum(s.bytes_up for s in history),
        bytes_down=setup_bytes + sum(s.bytes_down for s in history),
        extra={"unigram_entropy": corpus.unigram_entropy(),
               "variant": cfg.variant_label,
               "evaluated_parameters": EVALUATED_PARAMETERS[cfg.algorithm],
               "setup_bytes_down": setup_bytes,
               "worker_setup_seconds": sum(launch["worker_setup_seconds"] for launch in launches),
               "launches": launches,
               "num_parameters": num_parameters(model),
               "flops_per_token": model_flops_per_token(model_cfg, cfg.seq_len),
               "rejected_replies": sum(s.rejected for s in history),
               "unavailable_node_rounds": sum(len(s.unavailable_nodes) for s in history),
               "server_threads": torch.get_num_threads(),
               "eval_seconds": sum(r.get("eval_seconds") or 0.0 for r in run_log.records),
               "workers": worker_utilization(history)},
    )


# What the server evaluates and checkpoints, per algorithm (see strategies/diloco.py).
EVALUATED_PARAMETERS = {
    "diloco": "the global outer parameters θ, which every worker holds",
    "delayed": "the global outer parameters θ, which every worker holds",
    "eager": "the mean of the workers' own outer parameters θ_m, tracked exactly by the server",
}


def worker_utilization(history: list[RoundStats]) -> list[dict[str, Any]]:
    """Per worker: compute and idle seconds over the run, compute utilization, tokens/s
    while computing and MFU."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    for stats in history:
        for client in stats.per_client:
            rounds.setdefault(int(client["partition_id"]), []).append(client)
    rows = []
    for partition, clients in sorted(rounds.items()):
        compute = sum(float(c["compute_seconds"]) for c in clients)
        idle = sum(float(c["idle_seconds"]) for c in clients)
        tokens_per_second, worker_mfu = throughput(clients)
        rows.append({"partition_id": partition, "compute_seconds": compute, "idle_seconds": idle,
                     "compute_utilization": compute_utilization(compute, idle),
                     "tokens_per_second": tokens_per_second, "mfu": worker_mfu})
    return rows


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with `overrides` on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # HttpGrid retries a reply's missing objects after 1 s otherwise (fl_diloco/object_pull.py).
        pull_objects_sooner(http_grid)
        # The overrides (the simulation's whole config) are set on purpose, not defaults.
        run_server(grid, RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})}),
                   explicit_keys=tuple(overrides or ()))

    return app


app = make_server_app()
