"""Tool calling: the tools a request offers (spec), the model's call syntax (formats), the
grammar that constrains calls (grammar), and the parser that reads them back (parser).

Shared by the OpenAI server (runtime/http) and the language (lang): nothing here knows of
HTTP, processes or programs.
"""
