"""FrameDecoder: motion latents + an avatar's cached encoding -> RGB frames."""
