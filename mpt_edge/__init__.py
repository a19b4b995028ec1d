"""mpt-edge training core: Multitask Prompt Tuning on a frozen backbone."""

__version__ = "0.1.0"
