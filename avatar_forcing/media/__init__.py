"""Media I/O (video, audio, images) and face crops."""
