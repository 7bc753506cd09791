"""The shipped use case, card-payment fraud scoring: its schemas, features and model.

Platform code outside this package does not know it is scoring fraud.
"""
