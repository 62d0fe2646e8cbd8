"""The Gradio Blocks layout: the chat on the left, settings and model info on the right."""

from __future__ import annotations

import gradio as gr

from kimivl_local.cli.info import collect_info, format_info

from .chat import FILE_TYPES, default_settings
from .handlers import ChatHandlers
from .model_info import model_summary
from .uploads import UploadedFilesTextbox

CSS = """
#chat-col { max-width: 980px; margin: 0 auto; }
#chatbot { flex-grow: 1; }
#title h1 { margin: 0.2em 0 0; font-size: 1.4em; }
#title p { margin: 0; opacity: 0.7; }
.action-row button { min-width: 0; }
#stop:disabled { opacity: 0.45; }
#stop:enabled { color: #dc2626; border-color: #dc2626; font-weight: 600; }
#backend-info pre, #backend-info code { white-space: pre-wrap; word-break: break-word; }
/* The chat's delete (clear) icon stays on top of scrolled messages, and an image's toolbar sits at
   the image's top left, so it never lies under or beside that icon. */
#chatbot .wrapper > .top-panel { z-index: 20; background: var(--block-background-fill); }
#chatbot .message .image-container > .top-panel { right: auto; left: var(--size-1); }
"""


def build_ui(handlers: ChatHandlers, model) -> gr.Blocks:
    defaults = default_settings(model)
    with gr.Blocks(title="Kimi-VL local", fill_height=True, analytics_enabled=False) as demo:
        turns = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, elem_id="chat-col"):
                gr.Markdown(f"# Kimi-VL local\n{model_summary(model)}", elem_id="title")
                chatbot = gr.Chatbot(elem_id="chatbot", show_label=False, height="70vh",
                                     placeholder="Ask anything. Attach images, PDFs or videos with "
                                                 "the clip, by dropping them here, or by pasting.",
                                     buttons=["copy"], feedback_options=None)
                box = UploadedFilesTextbox(elem_id="input", show_label=False, sources=["upload"],
                                           file_types=FILE_TYPES, file_count="multiple",
                                           placeholder="Message Kimi-VL…", autofocus=True,
                                           # pasted text stays text (Gradio would turn more
                                           # than 1000 characters into a .txt attachment)
                                           max_plain_text_length=10**7)
                with gr.Row(elem_classes="action-row"):
                    # active only while an answer is generating: it shows that one is
                    stop = gr.Button("■ Stop", size="sm", variant="stop", elem_id="stop",
                                     interactive=False)
                    regenerate = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate")
                    edit = gr.Button("✎ Edit last", size="sm", elem_id="edit")
                    clear = gr.Button("✕ Clear", size="sm", elem_id="clear")
            with gr.Column(scale=1, min_width=280):
                system = gr.Textbox(label="System prompt", lines=3,
                                    placeholder="default: You are a helpful assistant")
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                            label="Temperature", info="0 = greedy",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p",
                                      elem_id="top-p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off",
                                      elem_id="top-k")
                    max_new_tokens = gr.Slider(16, 8192, value=defaults.max_new_tokens, step=16,
                                               label="Max new tokens", elem_id="max-new-tokens")
                with gr.Accordion("Documents", open=True):
                    pdf_pages = gr.Textbox(label="PDF pages", placeholder="all, or e.g. 1-3,5",
                                           elem_id="pdf-pages")
                    pdf_text = gr.Checkbox(label="Also read each page's text layer",
                                           elem_id="pdf-text")
                with gr.Accordion("Model and backend", open=False):
                    gr.Markdown(f"```\n{format_info(collect_info())}\n```", elem_id="backend-info")

        def stop_button(request: gr.Request):
            # still active when a second Enter found the first answer streaming
            return gr.Button(interactive=handlers.generating(request))

        settings = [system, temperature, top_p, top_k, max_new_tokens, pdf_pages, pdf_text]
        # Our own queue orders the work (shared with the API) and shows each chat its place in
        # it, so Gradio's per-event concurrency limit is lifted.
        for event, handler, inputs, outputs in [
                (box.submit, handlers.submit, [box, turns, *settings], [chatbot, turns, box]),
                (regenerate.click, handlers.regenerate, [turns, *settings], [chatbot, turns])]:
            event(lambda: gr.Button(interactive=True), None, stop, queue=False) \
                .then(handler, inputs, outputs, concurrency_limit=None, show_progress="hidden") \
                .then(stop_button, None, stop, queue=False)
        stop.click(handlers.stop, None, None, queue=False)
        edit.click(handlers.edit_last, [turns], [chatbot, turns, box], concurrency_limit=None)
        for clearing in (clear.click, chatbot.clear):  # the button and the chatbot's own bin icon
            clearing(handlers.clear, None, [chatbot, turns, box], concurrency_limit=None)
    return demo

