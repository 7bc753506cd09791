"""Code every service uses, written once: settings, errors, Kafka, codecs, gRPC, logging."""
