"""Experiment drivers built on the library (not imported by it): the Fashion-MNIST
study (`study`) and its figures (`plots`), and the throughput benchmark
(`benchmark`)."""
