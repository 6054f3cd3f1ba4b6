"""chatbot: AI answers streamed token by token, resumable across dropped connections and reloads."""

__version__ = "0.1.0"
