"""Chat: fine-tuning on dialogues, the terminal chat, the server."""
