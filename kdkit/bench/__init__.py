"""Measurements of kdkit itself: ``kdkit bench speed`` (see :mod:`kdkit.bench.speed`)."""
