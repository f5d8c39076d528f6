"""Run one ClientApp training round in this process, as a SuperNode would; used by the site-crash test."""

import json
import sys

from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from client.app import train
from tests.test_client import context, message

if __name__ == "__main__":
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    overrides, policy, model_dir, server_round = json.loads(sys.argv[1])
    reply = train(message(overrides, model_dir, server_round, kind=MessageType.TRAIN), context(overrides, policy))
    print(json.dumps({"declined": "decline" in reply.content}), flush=True)
