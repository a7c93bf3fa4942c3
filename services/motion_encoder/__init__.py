"""MotionEncoder: user face crops -> user motion latents; avatar portraits -> reference motion."""
