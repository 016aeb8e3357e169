"""Networks of the model: attribute encoders, critics, the Attributes dataclass and the loss terms."""

from networks import losses
from networks.attribute_encoder import FROZEN_BY_MODE, AttributeEncoder, mode_for_iteration
from networks.attributes import Attributes
from networks.discriminator import Discriminator, MultiScaleDiscriminator
from networks.encoders import (
    BACKBONES,
    TEXTURE_BACKBONES,
    BackgroundEncoder,
    CameraEncoder,
    LightEncoder,
    ShapeEncoder,
    TextureEncoder,
)

__all__ = [
    "BACKBONES",
    "FROZEN_BY_MODE",
    "TEXTURE_BACKBONES",
    "AttributeEncoder",
    "Attributes",
    "BackgroundEncoder",
    "CameraEncoder",
    "Discriminator",
    "LightEncoder",
    "MultiScaleDiscriminator",
    "ShapeEncoder",
    "TextureEncoder",
    "losses",
    "mode_for_iteration",
]
