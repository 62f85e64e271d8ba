"""The ServerApp: runs DiLoCo's outer loop over the connected SuperNodes.

Each round: send θ(t−1) to the M workers, wait for their outer gradients, let the strategy
take the outer Nesterov step, evaluate θ(t) on the held-out split every `eval_every`
rounds, and log one line. At the end: shut the workers down, save the final checkpoint,
summary.json and the loss plot under the run's output directory.
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
from fl_diloco.reporting import RunLog, finish_run, prepare_out_dir
from strategies.diloco import DiLoCo


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


def query_workers(grid: Grid, node_ids: list[int], action: str, timeout: float) -> list[int]:
    """Send a `query.<action>` to every node; returns the nodes that did not confirm."""
    messages = [Message(content=RecordDict({"config": ConfigRecord({})}),
                        message_type=f"{MessageType.QUERY}.{action}", dst_node_id=node)
                for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        if reply.has_error():
            log(WARNING, "node %d could not %s its worker: %s", reply.metadata.src_node_id, action,
                reply.error.reason)
    confirmed = {r.metadata.src_node_id for r in replies if not r.has_error()}
    return [node for node in node_ids if node not in confirmed]


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
    strategy = DiLoCo({n: p.detach().cpu() for n, p in model.named_parameters()}, node_ids,
                      outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum,
                      weighting=cfg.weighting)
    strategy.summary()
    setup_began = time.perf_counter()
    not_ready = query_workers(grid, node_ids, PREPARE_ACTION, cfg.round_timeout)
    if not_ready:
        raise RuntimeError(f"the workers of nodes {not_ready} could not start; see the log above")
    log(INFO, "%d workers ready in %.1fs", len(node_ids), time.perf_counter() - setup_began)
    run_log = RunLog(out_dir, cfg.rounds)
    run_log.log({"round": 0, "tokens_total": 0, "eval_loss": eval_params(strategy.params)})

    tokens_total = 0
    for server_round in range(1, cfg.rounds + 1):
        began = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(server_round),
                                        timeout=cfg.round_timeout)
        strategy.aggregate_train(server_round, replies)
        stats = strategy.history[-1]
        tokens_total += stats.tokens
        round_seconds = time.perf_counter() - began  # before evaluating: training throughput
        due = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
        run_log.log({
            "round": server_round,
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

    if query_workers(grid, node_ids, SHUTDOWN_ACTION, timeout=60):
        log(INFO, "some workers did not confirm shutdown; they exit at their idle timeout")
    save_checkpoint(out_dir / "checkpoint", strategy.params, cfg, model_cfg,
                    extra={"round": cfg.rounds, "tokens": tokens_total})
    history = strategy.history
    return finish_run(
        out_dir, cfg.algorithm, cfg, run_log,
        compute_seconds=sum(s.compute_seconds for s in history),
        idle_seconds=sum(s.idle_seconds for s in history),
        bytes_up=sum(s.bytes_up for s in history),
        bytes_down=sum(s.bytes_down for s in history),
        extra={"unigram_entropy": corpus.unigram_entropy(),
               "worker_setup_seconds": run_log.started - setup_began,
               "num_parameters": sum(p.numel() for p in model.parameters()),
               "rejected_replies": sum(s.rejected for s in history)},
    )


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with `overrides` on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})}))

    return app


app = make_server_app()
