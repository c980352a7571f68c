"""MoME MONAI Deploy operators (one per module); pure core functions are testable without Holoscan."""
