"""Everything that talks to Kafka: the serving loop (:mod:`.service`), its offset and recovery
bookkeeping, the trainer service (:mod:`.trainer`), the topics the replicas share
(:mod:`.changelog`, :mod:`.embedding_sync`, :mod:`.model_topic`) and topic export
(:mod:`.export`). Importing it opens no connection."""
