"""Cost per request: each engine step's measured cost, split over the requests that did work in it."""

from tokenfab.economics.attribution import CostMeter, RequestCost, StepCost, split_step

__all__ = ["CostMeter", "RequestCost", "StepCost", "split_step"]
