"""Model families trained by eve_megatron."""
