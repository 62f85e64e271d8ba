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

import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fl_diloco.checkpoint import save_checkpoint
from fl_diloco.client_app import PREPARE_ACTION, SHUTDOWN_ACTION
from fl_diloco.config import ConfigError, RunConfig, resolve_device
from fl_diloco.data import Corpus, load_corpus
from fl_diloco.evaluation import evaluate
from fl_diloco.model import Transformer, load_parameters, model_config
from fl_diloco.reporting import RunLog, compute_utilization, finish_run, prepare_out_dir
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


def query_workers(grid: Grid, node_ids: list[int], action: str, timeout: float,
                  content: RecordDict | None = None) -> list[int]:
    """Send a `query.<action>` to every node; returns the nodes that did not confirm."""
    messages = [Message(content=content or RecordDict({"config": ConfigRecord({})}),
                        message_type=f"{MessageType.QUERY}.{action}", dst_node_id=node)
                for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        if reply.has_error():
            log(WARNING, "node %d could not %s its worker: %s", reply.metadata.src_node_id, action,
                reply.error.reason)
    confirmed = {r.metadata.src_node_id for r in replies if not r.has_error()}
    return [node for node in node_ids if node not in confirmed]


class RoundPipeline:
    """Keeps up to D rounds open at once (D = strategy.in_flight) and closes them in order.

    Round r's messages go out as soon as round r − D is aggregated, so for `delayed` and
    `eager` the server never makes a worker wait on a round it could already have opened.
    """

    def __init__(self, grid: Grid, strategy: DiLoCo, last_round: int, timeout: float,
                 poll_interval: float = 0.05) -> None:
        self.grid, self.strategy = grid, strategy
        self.last_round, self.timeout, self.poll_interval = last_round, timeout, poll_interval
        self.next_to_send = 1
        self.open: dict[int, set[str]] = {}  # round → ids of its messages still unanswered

    def send_ready_rounds(self, aggregated_up_to: int) -> None:
        while (self.next_to_send <= self.last_round
               and self.next_to_send - self.strategy.in_flight <= aggregated_up_to):
            self.open[self.next_to_send] = set(self.grid.push_messages(
                self.strategy.configure_train(self.next_to_send)))
            self.next_to_send += 1

    def collect(self, server_round: int) -> list[Message]:
        """Round r's replies: all of them, or those in within `timeout` seconds of round r − 1
        closing (a round opened early may wait for phases still to run before it)."""
        waiting = self.open.pop(server_round)
        replies: list[Message] = []
        deadline = time.monotonic() + self.timeout
        while waiting and time.monotonic() < deadline:
            arrived = list(self.grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if waiting:
                time.sleep(self.poll_interval)
        if waiting:
            log(WARNING, "round %d: %d node(s) did not reply within round_timeout=%.0fs",
                server_round, len(waiting), self.timeout)
        return replies


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


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """DiLoCo's outer loop; returns the run's summary (also written to summary.json)."""
    if cfg.algorithm == "dp":
        raise ConfigError("algorithm=dp is the single-process data-parallel baseline, not a Flower "
                          "run; start it with `fl-diloco train algorithm=dp`")
    out_dir = prepare_out_dir(cfg)
    log(INFO, "fl-diloco %s: writing to %s", cfg.algorithm, out_dir)
    # Building the corpus here first also fills the tokenizer/token cache the workers read.
    corpus = load_corpus(cfg.data_config())
    check_partitions(corpus, cfg)
    validation = corpus.validation_sequences()[: cfg.eval_sequences]
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg.model_preset, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len)
    model = Transformer(model_cfg).to(device)

    def eval_params(params: Mapping[str, torch.Tensor]) -> float:
        load_parameters(model, params)
        return evaluate(model, validation, cfg.batch_size, device)["eval_loss"]

    node_ids = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout)
    strategy = DiLoCo.from_config(cfg, {n: p.detach().cpu() for n, p in model.named_parameters()},
                                  node_ids)
    strategy.summary()
    setup_began = time.perf_counter()
    initial_state = strategy.initial_state()
    not_ready = query_workers(grid, node_ids, PREPARE_ACTION, cfg.round_timeout, initial_state)
    if not_ready:
        raise RuntimeError(f"the workers of nodes {not_ready} could not start; see the log above")
    setup_bytes = serialized_bytes(initial_state) * len(node_ids)
    log(INFO, "%d workers ready in %.1fs; they are training", len(node_ids),
        time.perf_counter() - setup_began)
    run_log = RunLog(out_dir, cfg.flower_rounds)
    run_log.log({"round": 0, "outer_step": 0, "tokens_total": 0,
                 "eval_loss": eval_params(strategy.params)})

    pipeline = RoundPipeline(grid, strategy, cfg.flower_rounds, cfg.round_timeout)
    pipeline.send_ready_rounds(aggregated_up_to=0)
    tokens_total = 0
    round_began = time.perf_counter()
    for server_round in range(1, cfg.flower_rounds + 1):
        strategy.aggregate_train(server_round, pipeline.collect(server_round))
        # Open the next round(s) before evaluating, so evaluation never delays a worker.
        pipeline.send_ready_rounds(aggregated_up_to=server_round)
        stats = strategy.history[-1]
        tokens_total += stats.tokens
        round_seconds = time.perf_counter() - round_began
        due = server_round % (cfg.eval_every * cfg.num_fragments) == 0 or server_round == cfg.flower_rounds
        run_log.log({
            "round": server_round,
            "outer_step": server_round / cfg.num_fragments,
            "fragment": stats.fragment,
            "train_loss": stats.train_loss,
            "eval_loss": eval_params(strategy.params) if due else None,
            "tokens": stats.tokens,
            "tokens_total": tokens_total,
            "tokens_per_second": stats.tokens / round_seconds,
            "participants": stats.participants,
            "rejected": stats.rejected,
            "compute_seconds": stats.compute_seconds,
            "idle_seconds": stats.idle_seconds,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "clients": stats.per_client,
        })
        round_began = time.perf_counter()  # so the next round's throughput excludes evaluation

    if query_workers(grid, node_ids, SHUTDOWN_ACTION, timeout=60):
        log(INFO, "some workers did not confirm shutdown; they exit at their idle timeout")
    save_checkpoint(out_dir / "checkpoint", strategy.params, cfg, model_cfg,
                    extra={"round": cfg.flower_rounds, "tokens": tokens_total})
    history = strategy.history
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
               "worker_setup_seconds": run_log.started - setup_began,
               "num_parameters": sum(p.numel() for p in model.parameters()),
               "rejected_replies": sum(s.rejected for s in history),
               "workers": worker_utilization(history)},
    )


# What the server evaluates and checkpoints, per algorithm (see strategies/diloco.py).
EVALUATED_PARAMETERS = {
    "diloco": "the global outer parameters θ, which every worker holds",
    "delayed": "the global outer parameters θ, which every worker holds",
    "eager": "the mean of the workers' own outer parameters θ_m, tracked exactly by the server",
}


def worker_utilization(history: list[RoundStats]) -> list[dict[str, Any]]:
    """Per worker: compute and idle seconds over the run, and compute utilization."""
    totals: dict[int, dict[str, float]] = {}
    for stats in history:
        for client in stats.per_client:
            row = totals.setdefault(int(client["partition_id"]), {"compute_seconds": 0.0,
                                                                  "idle_seconds": 0.0})
            row["compute_seconds"] += float(client["compute_seconds"])
            row["idle_seconds"] += float(client["idle_seconds"])
    return [{"partition_id": p, **row,
             "compute_utilization": compute_utilization(row["compute_seconds"], row["idle_seconds"])}
            for p, row in sorted(totals.items())]


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with `overrides` on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})}))

    return app


app = make_server_app()
