"""The browser chat page (Streamlit): a chat.v1 client like any other. Start it with `chat-web`."""
