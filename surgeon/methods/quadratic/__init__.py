"""QuadraNet V2 quadratic depthwise neurons: the training layer, its dense inference form, and the method."""
