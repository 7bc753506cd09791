"""The MLOps platform's services: one package per service plus ``shared``."""
