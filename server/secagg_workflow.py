"""Flower 1.42's SecAgg+ workflow adapted to one Privet round: the legacy strategy it drives, a fix for early
dropouts, and a grid that records who dropped at which stage and drops malformed replies."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.common import FitIns, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow

from common import secure_wire as wire
from server.strategy import safe_text

def run_id_of(grid) -> int:
    """The run id the grid serves (0 for a test grid without a run)."""
    try:
        return int(grid.run.run_id)
    except Exception:  # noqa: BLE001 (a test grid may have no run)
        return 0


def _short_reason(reason) -> str:
    """The message of a ClientApp's exception, without the transport's traceback around it."""
    text = str(reason)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1].strip().splitlines()[0]
    return safe_text(text)


class OneRound(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow drives: fixed FitIns per node in, the unmasked aggregate out."""

    def __init__(self, fitins: dict[int, FitIns], grid):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2)
        self.fitins = fitins
        self.proxies = {node: GridClientProxy(node_id=node, grid=grid, run_id=run_id_of(grid)) for node in fitins}
        self.results: list = []
        self.failures: list = []
        self.parameters = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(self.proxies[node], ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        # SecAgg+ already divided the sum by the total weight and put that mean into every FitRes;
        # legacy FedAvg would only average identical copies again (and divide by zero if all declined).
        self.results, self.failures = list(results), list(failures)
        self.parameters = results[0][1].parameters if results else None
        return None, {}


class PatchedSecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, made to survive a site that drops before it has shared its keys, and to show the
    summed weight it divides by.

    flwr 1.42 keeps such a site among the sampled ones, so in the unmask stage it asks the others
    for shares of its key, which they never received: every site fails and the round is lost.
    A site that dropped in setup or share-keys added no mask to anyone's vector, so it is simply
    left out; sites that drop later are handled by the protocol as designed.
    """

    total_weight: int | None = None  # the unmasked sum of the sites' quantized weights, set by unmask_stage

    def unmask_stage(self, grid, context, state) -> bool:
        # Flower divides by the summed weight inside this stage and keeps it to itself; the server must check it
        # (a rogue site chooses the weight in its own masked vector), so record it on its way through.
        extract = secaggplus_workflow.factor_extract

        def recording(parameters):
            total, rest = extract(parameters)
            self.total_weight = int(total)
            return total, rest

        secaggplus_workflow.factor_extract = recording
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            secaggplus_workflow.factor_extract = extract

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        gone = set(state.sampled_node_ids) - set(state.active_node_ids)
        if gone:
            state.sampled_node_ids = set(state.active_node_ids)
            for node, neighbours in state.nid_to_neighbours.items():
                state.nid_to_neighbours[node] = neighbours - gone
        return ok


class WatchedGrid:
    """The grid as SecAgg+ sees it: notes who drops out at which stage, and drops malformed replies.

    A dropped reply makes its sender a dropout for the protocol, so its masks are removed like
    those of a site that went silent, instead of a wrong-shaped vector crashing the workflow or,
    worse, being broadcast into the sum.
    """

    def __init__(self, grid, nodes: set[int], *, shapes, modulus_range: int, max_weight: float, identities):
        self._grid = grid
        self.identities = identities
        self.nodes = nodes
        self.shapes = [tuple(s) for s in shapes]
        self.modulus_range = modulus_range
        self.max_weight = max_weight
        self.stage = ""
        self.dropped: dict[int, str] = {}
        self.collected: dict[int, Message] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages:
            self.stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = {msg.metadata.src_node_id for msg in replies}
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.dropped[msg.metadata.dst_node_id] = f"stage {self.stage}: no reply within {timeout}s"
        refused = self._refused_identities(replies) if self.stage == Stage.COLLECT_MASKED_VECTORS else {}
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self.nodes:
                continue
            if node in refused:
                # Dropped before the sum: SecAgg+ then removes this node's masks like a dropout's.
                self.dropped[node] = f"stage {self.stage}: reply rejected: {refused[node]}"
                continue
            if msg.has_error():
                self.dropped[node] = f"stage {self.stage}: error reply: {_short_reason(msg.error.reason)}"
                kept.append(msg)
                continue
            problem = self._problem(msg)
            if problem:
                self.dropped[node] = f"stage {self.stage}: reply rejected: {problem}"
                continue
            if self.stage == Stage.COLLECT_MASKED_VECTORS:
                self.collected[node] = msg
            kept.append(msg)
        return kept

    def _refused_identities(self, replies: list[Message]) -> dict[int, str]:
        """Judge the site ids the masked-vector replies name against the nodes' bound identities."""
        claims = {}
        for msg in replies:
            if msg.has_error() or msg.metadata.src_node_id not in self.nodes:
                continue
            try:
                metrics = compat.recorddict_to_fitres(msg.content, keep_input=True).metrics
            except (KeyError, TypeError, ValueError):
                continue  # malformed: _problem sets it aside
            claimed = metrics.get(wire.SITE_ID)
            node = msg.metadata.src_node_id
            claims[node] = claimed if isinstance(claimed, str) and claimed.isprintable() else f"node-{node}"
        return self.identities.judge(claims)[1]

    def _problem(self, msg: Message) -> str | None:
        try:
            cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
            if self.stage == Stage.SETUP:
                if not all(isinstance(cfg[k], bytes) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)):
                    return "public keys are not bytes"
            elif self.stage == Stage.SHARE_KEYS:
                dsts, ctxts = cfg[Key.DESTINATION_LIST], cfg[Key.CIPHERTEXT_LIST]
                if len(dsts) != len(ctxts) or not set(dsts) <= self.nodes:
                    return "malformed key shares"
            elif self.stage == Stage.COLLECT_MASKED_VECTORS:
                vectors = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
                if [v.shape for v in vectors] != self.shapes:
                    return "masked vector shapes differ from the adapter's"
                for v in vectors:
                    if v.dtype.kind not in "iu" or (v.size and (v.min() < 0 or v.max() >= self.modulus_range)):
                        return "masked vector is not integers modulo the protocol's modulus"
                fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
                if not 0 <= fitres.num_examples <= self.max_weight:
                    return f"weight {fitres.num_examples} outside [0, {self.max_weight:g}]"
            elif self.stage == Stage.UNMASK:
                nids, shares = cfg[Key.NODE_ID_LIST], cfg[Key.SHARE_LIST]
                if len(nids) != len(shares) or not set(nids) <= self.nodes:
                    return "malformed secret shares"
        except (KeyError, TypeError, ValueError) as err:
            return f"malformed reply ({type(err).__name__})"
        return None
