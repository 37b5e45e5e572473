"""What the hardware costs: the price catalogue and the power meters that measure or model energy."""

from tokenfab.platform.power import ModelledMeter, NvmlMeter, PowerMeter, RaplMeter, select_meter
from tokenfab.platform.prices import PROFILES, DeviceProfile, Prices, load_prices

__all__ = [
    "PROFILES",
    "DeviceProfile",
    "ModelledMeter",
    "NvmlMeter",
    "PowerMeter",
    "Prices",
    "RaplMeter",
    "load_prices",
    "select_meter",
]
