"""The streaming worker: the Faust app and everything it needs to talk to Kafka.

``app`` wires topics, tables and agents; ``checkpoint`` is the commit protocol
(state before offsets); ``decode`` turns a batch of records into judged events;
``transport``, ``kafka`` and ``broker`` are the Kafka clients and the embedded
broker; ``startup`` checks local state before Faust starts.
"""
