"""A ClientApp whose site-1 crashes in every even round, for the dropout test."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) % 2 == 0:
        raise RuntimeError("simulated site crash")
    return real.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
