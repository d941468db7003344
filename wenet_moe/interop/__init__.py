"""Interoperation with WeNet: import WeNet model directories, export back to WeNet's
layout, and sparse upcycling of dense checkpoints into MoE ones."""
