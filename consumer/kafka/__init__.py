"""The Kafka adapter: the only package that imports confluent_kafka. The consumer (source), the producer
(sink), whole-topic reads (reader), topics (admin) and fetched messages (message) behind typed interfaces."""
